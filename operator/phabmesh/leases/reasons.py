"""The reasons lease decisions give, shared by plans, readiness and explanations: a
binding's Ready and BotReady reasons, and a lease's revocation reasons.
"""

from __future__ import annotations

from phabmesh import resources

# Binding Ready / BotReady reasons.
READY = "Ready"  # the bot is Ready and may be used from this namespace
INVALID_SPEC = "InvalidSpec"  # the spec could not be parsed (should be stopped by the CRD)
INVALID_SUBJECTS = "InvalidSubjects"  # identities or identityRefs make no sense together
BOT_NOT_READY = "BotNotReady"  # the bot allows this namespace but its Ready is not True
# spec.botRef names no PhabricatorBot, or one whose namespaceSelector excludes this
# namespace: one answer for both, so that a binding cannot be used to find out which bots
# exist (the bot's own status and the operator's log tell an administrator which it is).
BOT_NOT_ALLOWED = "BotNotAllowed"

# Lease revocation reasons (PhabricatorCredential status.reason) are defined, with the
# CRD's documentation of each, in phabmesh.resources.
POD_TERMINATING = resources.POD_TERMINATING
POD_SUCCEEDED = resources.POD_SUCCEEDED
POD_FAILED = resources.POD_FAILED
POD_DELETED = resources.POD_DELETED
POD_GONE = resources.POD_GONE
NOT_RUNNING = resources.POD_NOT_RUNNING
NOT_MESHED = resources.POD_NOT_MESHED
NO_LONGER_MATCHED = resources.NO_LONGER_MATCHED
BINDING_DELETED = resources.BINDING_DELETED
BINDING_NOT_READY = resources.BINDING_NOT_READY
BOT_LOST = resources.BOT_NOT_READY
BOT_CHANGED = resources.BOT_CHANGED
BOT_GONE_HERE = resources.BOT_NOT_ALLOWED
REVOKED_BY_ADMIN = resources.REVOKED_BY_ADMIN
