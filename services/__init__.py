"""modalmesh services: each folder is a library first and a server second."""
