"""car_med.networks."""
