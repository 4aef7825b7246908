"""car_med.engines."""
