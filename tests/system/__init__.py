"""The system-level suite: `uns up` of the example plant on real Mosquitto, under faults,
load and hostile input (a package, so its conftest never shadows tests/conftest.py)."""
