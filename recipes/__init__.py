"""dpokit recipes: single-file training scripts, one per `<name>.py`, with their YAML configs in
`configs/<name>/`. The `dpokit` CLI finds them by scanning this folder; `configs` (a package) also
holds the config layer the recipes share: YAML loading, overrides and `_component_` instantiation.
"""
