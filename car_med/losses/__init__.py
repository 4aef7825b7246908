"""car_med.losses."""
