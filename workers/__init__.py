"""negcase: learn from every losing trade, live.

The public API for trading engines and tools is importable from here:

    from negcase import SignalClient, Predictor, TradeClosed, Settings, ModelFactory

The package's rooms: `processes` (the loss detector, trainer and inference worker and their
compute), `cli` (the operator's `negcase` command), `client` (what engines call), `sim`
(the demo, the backtest and the benches), `runtime` (what every process shares), `schemas`
(wire and storage types) and `store` (everything that touches Redis or disk).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Name -> module. Imported on first use, so that `import negcase` (and the CLI's cheap
# commands) do not pay for torch unless a name that needs it is asked for.
_PUBLIC = {
    "SignalClient": "negcase.client.signal_client",
    "SignalTimeout": "negcase.client.signal_client",
    "Predictor": "negcase.client.predictor",
    "NoModelYet": "negcase.client.predictor",
    "publish_trades": "negcase.client.trades",
    "TradeClosed": "negcase.schemas.trade",
    "TradeError": "negcase.schemas.trade",
    "Signal": "negcase.schemas.signal",
    "Settings": "negcase.runtime.settings",
    "ModelFactory": "negcase.processes.model",
}

__all__ = [
    "ModelFactory",
    "NoModelYet",
    "Predictor",
    "Settings",
    "Signal",
    "SignalClient",
    "SignalTimeout",
    "TradeClosed",
    "TradeError",
    "__version__",
    "publish_trades",
]

if TYPE_CHECKING:
    from negcase.client.predictor import NoModelYet, Predictor
    from negcase.client.signal_client import SignalClient, SignalTimeout
    from negcase.client.trades import publish_trades
    from negcase.processes.model import ModelFactory
    from negcase.runtime.settings import Settings
    from negcase.schemas.signal import Signal
    from negcase.schemas.trade import TradeClosed, TradeError


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'negcase' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
