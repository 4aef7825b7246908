"""car_med.data."""
