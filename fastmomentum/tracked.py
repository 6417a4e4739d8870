"""``optimizer.state`` that notes when user code changes it, so a step costs no scan.

torch keeps ``optimizer.state`` as a ``defaultdict(dict)`` that anyone may edit: replace
an entry (``state[p] = {}``), clear one (``state[p].clear()``), drop a value
(``state[p]["momentum_buffer"] = None``) or delete one (``del state[p]``). torch.optim
reads the dict afresh at every step and so restarts that parameter's state; our state
lives in the buckets, so every such change must be seen before the next step. These
two dict types record any change that is not ours in `StateMap.changed`, exactly and
at no cost to a step that finds nothing changed. Reads never count as changes (a read
of a parameter without state makes an empty entry, as torch's ``defaultdict`` does).

Copies (``deepcopy``, pickling) are plain ``defaultdict``/``dict`` objects, as torch's.
"""

from collections import defaultdict

_MISSING = object()


class StateMap(defaultdict):
    """``optimizer.state``: a ``defaultdict(dict)`` whose entries are `StateEntry`
    objects and whose ``changed`` is set by any edit of it or of an entry."""

    def __init__(self, items=()):
        super().__init__(dict)
        self.changed = False
        for key, value in dict(items).items():
            dict.__setitem__(self, key, value)

    def __missing__(self, key):
        entry = StateEntry(self)
        dict.__setitem__(self, key, entry)
        return entry

    def put(self, key, entry):
        """Set ``self[key]`` without counting it as a change (our own exposure)."""
        dict.__setitem__(self, key, entry)

    def __setitem__(self, key, value):
        if dict.get(self, key, _MISSING) is not value:
            self.changed = True
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        self.changed = True
        dict.__delitem__(self, key)

    def pop(self, *args):
        self.changed = True
        return dict.pop(self, *args)

    def popitem(self):
        self.changed = True
        return dict.popitem(self)

    def clear(self):
        self.changed = True
        dict.clear(self)

    def setdefault(self, key, default=None):
        if key not in self:
            self.changed = True
        return dict.setdefault(self, key, default)

    def update(self, *args, **kwargs):
        self.changed = True
        dict.update(self, *args, **kwargs)

    def __ior__(self, other):
        self.update(other)
        return self

    def __reduce__(self):
        return defaultdict, (dict,), None, None, iter(self.items())

    def copy(self):
        return defaultdict(dict, self)

    __copy__ = copy


class StateEntry(dict):
    """``optimizer.state[p]``: a dict that sets its `StateMap`'s ``changed`` when edited."""

    def __init__(self, owner, items=()):
        super().__init__(items)
        self._owner = owner

    def _changed(self):
        self._owner.changed = True

    def __setitem__(self, key, value):
        if dict.get(self, key, _MISSING) is not value:  # ``state[p]["step"] += 1``: no change
            self._changed()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        self._changed()
        dict.__delitem__(self, key)

    def pop(self, *args):
        self._changed()
        return dict.pop(self, *args)

    def popitem(self):
        self._changed()
        return dict.popitem(self)

    def clear(self):
        self._changed()
        dict.clear(self)

    def setdefault(self, key, default=None):
        if key not in self:
            self._changed()
        return dict.setdefault(self, key, default)

    def update(self, *args, **kwargs):
        self._changed()
        dict.update(self, *args, **kwargs)

    def __ior__(self, other):
        self.update(other)
        return self

    def __reduce__(self):
        return dict, (dict(self),)

    def copy(self):
        return dict(self)

    __copy__ = copy
