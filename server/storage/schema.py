"""Table definitions (SQLAlchemy Core) of the chat server's database: the current schema.

Portable across SQLite, PostgreSQL and MySQL/MariaDB:
- public ids are 32 hex characters (128 random bits); other identifiers are short strings;
- times are unix seconds as DOUBLE (never MySQL's single-precision FLOAT);
- ``meta`` columns hold JSON as text (one encoding everywhere, no dialect JSON quirks);
- on MySQL/MariaDB every table is utf8mb4 with a *binary* collation, so any Unicode text
  (emoji included) is stored as given and ``client_id``/``username`` compare exactly
  (a case-insensitive collation would make "Ab" and "ab" the same client message).
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

metadata = sa.MetaData()

_MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}

ID = sa.String(32)                       # secrets.token_hex(16)
NAME = sa.String(128)                    # visitor ids, sender ids, client ids, usernames
TIME = sa.Double()
SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
#: Message text: MySQL's TEXT stops at 64 KiB of *bytes*; MEDIUMTEXT holds 16 MiB.
LONGTEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

schema_version = sa.Table(
    "kefu_schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", TIME, nullable=False),
    **_MYSQL,
)

conversations = sa.Table(
    "kefu_conversations", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("visitor_id", NAME, nullable=False),
    sa.Column("bot", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("agent_id", ID, nullable=True),
    sa.Column("created_at", TIME, nullable=False),
    sa.Column("updated_at", TIME, nullable=False),
    # The last seq handed out in this conversation: bumped in the same transaction as the
    # message inserts, so seqs are contiguous from 1.
    sa.Column("last_seq", SEQ, nullable=False, server_default="0"),
    sa.Column("meta", LONGTEXT, nullable=False),
    sa.Index("ix_kefu_conversations_state", "state", "created_at"),
    sa.Index("ix_kefu_conversations_agent", "agent_id", "created_at"),
    sa.Index("ix_kefu_conversations_visitor", "visitor_id", "created_at"),
    sa.Index("ix_kefu_conversations_created", "created_at"),
    **_MYSQL,
)

messages = sa.Table(
    "kefu_messages", metadata,
    sa.Column("conversation_id", ID, nullable=False),
    sa.Column("seq", SEQ, nullable=False, autoincrement=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("sender_id", NAME, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("text", LONGTEXT, nullable=False),
    sa.Column("client_id", NAME, nullable=True),
    sa.Column("created_at", TIME, nullable=False),
    sa.Column("meta", LONGTEXT, nullable=False),
    sa.PrimaryKeyConstraint("conversation_id", "seq", name="pk_kefu_messages"),
    # NULL client ids are distinct in all three databases: only real client ids dedupe.
    sa.UniqueConstraint("conversation_id", "client_id", name="uq_kefu_messages_client"),
    **_MYSQL,
)

agents = sa.Table(
    "kefu_agents", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("username", NAME, nullable=False),
    sa.Column("display_name", sa.String(255), nullable=False),
    sa.Column("password_hash", sa.String(512), nullable=False),
    sa.Column("capacity", sa.Integer, nullable=False),
    sa.Column("token_version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_at", TIME, nullable=False),
    sa.Column("team", sa.String(64), nullable=False),
    sa.UniqueConstraint("username", name="uq_kefu_agents_username"),
    **_MYSQL,
)
