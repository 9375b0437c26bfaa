"""Server side: config, round loop, evaluation, run folder, CLI; ServerApp in app.py."""
