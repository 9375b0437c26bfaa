"""Client side: data, profiles, local recipe (adversarial training), ClientApp in app.py."""
