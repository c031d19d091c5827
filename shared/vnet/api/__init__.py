"""``VNetManager`` mixins, one per service; each uses ``ClientBase.call``."""
