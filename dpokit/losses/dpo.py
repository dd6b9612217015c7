"""Kept so `dpokit.losses.dpo.dpo_loss` keeps working; the family lives in dpo_family.py."""

from dpokit.losses.dpo_family import dpo_loss

__all__ = ["dpo_loss"]
