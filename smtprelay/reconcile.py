"""The Gmail form of the recipient rule, under its former name.

The rule now lives in :mod:`smtprelay.recipients`; this module re-exports
its header-editing form so that ``from smtprelay.reconcile import reconcile``
keeps working.
"""

from smtprelay.recipients import Reconciled, reconcile

__all__ = ["Reconciled", "reconcile"]
