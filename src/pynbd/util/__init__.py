"""Small helpers shared by the command line, the config file and the backends."""
