"""Wire and storage types: TradeClosed, NegativeCase, Event, and their validation."""
