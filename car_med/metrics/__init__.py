"""car_med.metrics."""
