"""Business bots, one package per bot; each is a pluggy plugin registered in the ``kefu.plugins`` entry-point group."""
