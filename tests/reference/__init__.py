"""Independent reference implementations that the steering engine is checked against."""
