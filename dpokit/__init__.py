"""dpokit: PyTorch-native preference alignment (DPO and its family).

Import what you need from the subpackages: `dpokit.losses`, `dpokit.models`, `dpokit.data`,
`dpokit.training`. This top-level module stays light so the `dpokit` CLI starts fast.
"""

__version__ = "0.1.0"
