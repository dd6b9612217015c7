"""dpokit recipes: single-file training scripts, one per `<name>.py`, with their YAML configs in
`configs/<name>/`. The build maps this folder to the package `dpokit.recipes` (pyproject's
package-dir); the `dpokit` CLI finds recipes by scanning it. The config layer they share is
`dpokit.config`.
"""
