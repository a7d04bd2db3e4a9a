"""Gradio's per-visitor session, kept lean: what a session that a visitor left behind costs the server.

Gradio keeps a ``SessionState`` for every session hash it has seen (every page, every API client, every visitor who
closed the tab mid-answer), up to the app's ``--session-capacity`` (Gradio's ``state_session_capacity``), and for an
hour after the visitor left. Besides what the app stores there (our ``gr.State``s: the shown answer, the question a
check made, the chat's id), Gradio 6.31 keeps in each a copy of the config of every component of the page
(``config_values``: every prop and the API's JSON schemas), and it recomputes the config of every input and output
of every event the visitor runs. That copy serves one Gradio feature only, deep links (``gr.DeepLinkButton``, which
this app does not have). Measured with ``tracemalloc`` on this page: 200 KiB per session, against 5 KiB of the
app's own state; so 256 sessions held 50 MiB, a good part of what ``benchmarks/soak.py`` saw grow.

Here the same configs are made when something reads them (the deep-link route), not for every session and event:
``_LazyConfigs`` is the dict Gradio reads, filled on access from the session's own blocks, with the input values
Gradio would have written into it applied then. Everything else a session holds is Gradio's, unchanged.
``tests/test_sessions.py`` checks that a session that ran the app's events gives the same deep-link configs and the
same state as Gradio's own ``SessionState``, and how much less it holds.
"""

from __future__ import annotations

import datetime
import logging
import os
import weakref
from collections.abc import Iterator, Mapping
from copy import copy
from typing import Any

import gradio as gr
from gradio.components import State
from gradio.state_holder import SessionState, StateHolder

log = logging.getLogger(__name__)


class _LazyConfigs(Mapping):
    """``SessionState.config_values``, made when read: block id → ``config_for_block`` of the session's block, with
    the input value Gradio last wrote into its props. Its keys, in Gradio's order: the page's blocks, then the
    blocks made while the session's events ran that Gradio would have written a config for."""

    def __init__(self, session: LeanSession) -> None:
        self._session = weakref.ref(session)  # no cycle: an evicted session (and its state) is freed at once
        self.made: dict[int, dict] = {}
        self.values_in: dict[int, Any] = {}  # block id → the value Gradio writes into its config's props
        self.extra: dict[int, None] = {}  # blocks outside the page Gradio's copy would hold, in its order

    @property
    def session(self) -> LeanSession:
        return self._session()

    def _keys(self) -> list[int]:
        page = self.session.block_ids
        return [k for k in self.session.blocks_config.blocks if k in page] + list(self.extra)

    def __getitem__(self, key: int) -> dict:
        if key in self.made:
            return self.made[key]
        config_of, blocks = self.session.blocks_config.config_for_block, self.session.blocks_config.blocks
        if key not in blocks or (key not in self.session.block_ids and key not in self.extra):
            raise KeyError(key)
        config = self.made[key] = config_of(key, [], blocks[key])
        if key in self.values_in and "props" in config:
            config["props"]["value"] = self.values_in.pop(key)
        return config

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def changed(self, key: int) -> None:
        """Gradio would write this block's config now: it is made again when read."""
        self._written(key)
        self.made.pop(key, None)
        self.values_in.pop(key, None)

    def value_in(self, key: int, value: Any) -> None:
        """Gradio would write ``value`` into this block's config's props now."""
        self._written(key)
        if key not in self.made:
            self.values_in[key] = value
        elif "props" in self.made[key]:
            self.made[key]["props"]["value"] = value

    def _written(self, key: int) -> None:
        if key not in self.session.block_ids:  # a block made while an event ran: Gradio's copy holds it from now on
            self.extra.setdefault(key)


class LeanSession(SessionState):
    """Gradio's ``SessionState`` with ``config_values`` made when read instead of for every session and event."""

    def __init__(self, blocks: gr.Blocks) -> None:  # Gradio's __init__ less the eager config copy
        self.blocks_config = copy(blocks.default_config)
        self.block_ids = blocks.blocks.keys()  # the page's blocks (a view, not a copy): Gradio's copy covers those
        self.config_values = _LazyConfigs(self)
        self.state_data: dict[int, Any] = {}
        self._state_ttl = {}
        self.is_closed = False
        self.STATE_TTL_WHEN_CLOSED = 1 if os.getenv("GRADIO_IS_E2E_TEST", None) else 3600

    def __setitem__(self, key: int, value: Any) -> None:  # Gradio's, less the config it made at once
        block = self.blocks_config.blocks.get(key)
        if isinstance(block, State):
            self._state_ttl[key] = (block.time_to_live, datetime.datetime.now())
            self.state_data[key] = value
        else:
            self.blocks_config.blocks[key] = value
        if block:
            self.config_values.changed(key)

    def _update_config(self, key: int) -> None:
        if self[key] is not None:
            self.config_values.changed(key)

    def _update_value_in_config(self, key: int, value: Any) -> None:
        self.config_values.value_in(key, value)


class LeanStateHolder(StateHolder):
    """Gradio's ``StateHolder`` whose new sessions are ``LeanSession``s (capacity, expiry and eviction: Gradio's)."""

    def __getitem__(self, session_id: str) -> SessionState:
        if session_id not in self.session_data:
            self.session_data[session_id] = LeanSession(self.blocks)
        return super().__getitem__(session_id)


_EXPECTED = {"blocks_config", "config_values", "state_data", "_state_ttl", "is_closed", "STATE_TTL_WHEN_CLOSED"}


def fits(blocks: gr.Blocks) -> bool:
    """Whether this Gradio's ``SessionState`` holds what ``LeanSession`` was written for (its attributes, its methods);
    where not, the app keeps Gradio's own sessions and says so."""
    try:
        made = set(vars(SessionState(blocks)))
    except Exception:  # noqa: BLE001 - any failure means it does not fit
        return False
    methods = all(callable(getattr(SessionState, m, None)) for m in ("_update_config", "_update_value_in_config"))
    return made == _EXPECTED and methods


class Blocks(gr.Blocks):
    """``gr.Blocks`` whose server keeps lean sessions: when Gradio's server attaches its ``StateHolder``
    (``StateHolder.set_blocks`` assigns ``blocks.state_holder``), it becomes a ``LeanStateHolder``."""

    @property
    def state_holder(self) -> StateHolder:
        return self.__dict__["state_holder"]

    @state_holder.setter
    def state_holder(self, holder: StateHolder) -> None:
        if type(holder) is StateHolder:
            if fits(self):
                holder.__class__ = LeanStateHolder  # same object, which Gradio's routes also hold
            else:
                log.warning("This Gradio's sessions are not what blipdemo knows: each keeps a full config copy.")
        self.__dict__["state_holder"] = holder
