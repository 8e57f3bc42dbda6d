"""Replicas shared by several gateways: whose calls count against a replica's limits.

``max_ongoing_requests`` and the bounded-load capacity are about a
replica's calls, whichever gateway sent them. A gateway knows its own calls
exactly (it counts them as it sends and as the replies come back) and learns
the others' from the replica: every ``Reply`` and ``Pong`` carries the
replica's count of the calls it holds (``ReplicaState.in_flight``, running
or waiting for a slot, every connection's), taken as the frame is written.
At the moment the gateway reads that frame, the replica's count held

* this gateway's calls that had reached the replica and were not answered
  yet (the connection's unanswered calls, less those still on their way
  there), and
* the other gateways' calls.

So the other gateways' share is the count less this gateway's unanswered
calls (:func:`others_in_flight`). It can only err low, by the calls of this
gateway still on their way to the replica: the router then sends a little
more than the limit allows, and the replica's own guard (it runs at most
``max_ongoing_requests`` calls and lets a few more wait) absorbs it. It
never errs high while the reports flow, and they flow with every reply: a
gateway that sends to a replica hears from it within one call; one that
does not, within a ping (about a second).

The router then routes on ``own + others`` for every replica: the
bounded-load capacity counts every gateway's calls (``T`` in the rule), a
replica is full at ``max_ongoing_requests`` of all gateways' calls together,
and least-loaded choices compare totals. A replica that still gets more
than it can take refuses the call with ``overloaded`` (it never ran): the
refusal carries the replica's count like any reply, so the router sees the
replica full, and the dispatcher routes the request again, not counting
the refusal as a failure of the replica or of the model.

With one gateway the other gateways' share is always 0 and routing is what
it was.
"""

from __future__ import annotations

__all__ = ["others_in_flight"]


def others_in_flight(reported: int, own_unanswered: int) -> int:
    """The other gateways' calls on a replica, from its report.

    Args:
        reported: the replica's count of its calls (``ReplicaState.in_flight``).
        own_unanswered: this gateway's calls to it without a reply when the
            report was read.
    """
    return max(0, reported - own_unanswered)
