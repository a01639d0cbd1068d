"""The taxiway command line: thin command groups, each calling one part's API."""
