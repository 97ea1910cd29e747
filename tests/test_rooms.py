"""Each room applies its own part of a new configuration: the per-mailbox
slots resize, the lockout takes new limits, the front door new settings; and
the errors the admin API names live where it can import them without a cycle."""

import subprocess
import sys

from twisted.internet import defer, task
from twisted.trial import unittest

from smtprelay.config import AuthConfig, Config, SMTPConfig
from smtprelay.slots import MailboxSlots
from smtprelay.smtp.auth import Lockout
from smtprelay.smtp.server import FrontDoor


class SlotsTests(unittest.TestCase):
    def fired(self, ds):
        return [d.called for d in ds]

    def test_holders_per_mailbox_and_fifo_waiters(self):
        slots = MailboxSlots(2)
        ds = [slots.acquire("M@x.org") for _ in range(4)]
        self.assertEqual(self.fired(ds), [True, True, False, False])
        self.assertEqual(slots.in_flight("m@x.org"), 2)
        self.assertEqual(slots.waiting(), 2)
        self.assertTrue(slots.acquire("other@x.org").called)
        slots.release("m@x.org")
        self.assertEqual(self.fired(ds), [True, True, True, False])

    def test_growing_lets_waiters_in_at_once(self):
        slots = MailboxSlots(1)
        ds = [slots.acquire("m@x.org") for _ in range(3)]
        slots.resize(3)
        self.assertEqual(self.fired(ds), [True, True, True])
        self.assertEqual(slots.in_flight("m@x.org"), 3)
        self.assertEqual(slots.waiting(), 0)

    def test_shrinking_holds_new_holders_until_enough_left(self):
        slots = MailboxSlots(3)
        for _ in range(3):
            slots.acquire("m@x.org")
        slots.resize(1)
        late = slots.acquire("m@x.org")
        slots.release("m@x.org")
        slots.release("m@x.org")
        self.assertFalse(late.called)  # one holder left: the new limit
        slots.release("m@x.org")
        self.assertTrue(late.called)
        self.assertEqual(slots.in_flight("m@x.org"), 1)

    def test_an_idle_mailbox_is_forgotten(self):
        slots = MailboxSlots(1)
        slots.acquire("m@x.org")
        waiter = slots.acquire("m@x.org")
        waiter.cancel()
        self.failureResultOf(waiter, defer.CancelledError)
        self.assertEqual(slots.waiting(), 0)
        slots.release("m@x.org")
        self.assertEqual(slots._boxes, {})
        self.assertEqual(slots.in_flight("m@x.org"), 0)

    def test_releasing_a_slot_not_held_is_an_error(self):
        slots = MailboxSlots(1)
        slots.acquire("m@x.org")
        slots.release("m@x.org")
        self.assertRaises(KeyError, slots.release, "m@x.org")

    def test_a_concurrency_below_one_is_refused(self):
        self.assertRaises(ValueError, MailboxSlots(1).resize, 0)


class LockoutApplyTests(unittest.TestCase):
    def test_new_limits_count_from_now_and_a_lockout_keeps_its_end(self):
        clock = task.Clock()
        lockout = Lockout(clock, 3, 60.0)
        lockout.failure("1.1.1.1")
        for _ in range(3):
            lockout.failure("2.2.2.2")
        self.assertTrue(lockout.locked("2.2.2.2"))
        lockout.apply(AuthConfig(max_failures=2, lockout=600.0))
        self.assertEqual((lockout.max_failures, lockout.window), (2, 600.0))
        self.assertTrue(lockout.failure("1.1.1.1"))  # the second failure is enough now
        clock.advance(61)
        self.assertFalse(lockout.locked("2.2.2.2"))  # locked out under the old window
        self.assertTrue(lockout.locked("1.1.1.1"))  # under the new one


class FrontDoorApplyTests(unittest.TestCase):
    def test_new_sessions_get_the_new_settings(self):
        clock = task.Clock()
        old = Config(smtp=SMTPConfig(hostname="old.example", idle_timeout=300.0))
        lockout = Lockout(clock, 5, 900.0)
        portal, context = object(), object()
        door = FrontDoor(old, None, clock, object(), lockout)
        door.sessions.add("a session")
        new = Config(smtp=SMTPConfig(hostname="new.example", idle_timeout=30.0))
        door.apply(new, context, portal)
        self.assertIs(door.config, new)
        self.assertIs(door.intake.config, new)  # messages of new sessions too
        self.assertEqual(door.hostname, "new.example")
        self.assertIs(door.tls_context, context)
        self.assertIs(door.portal, portal)
        self.assertIs(door.lockout, lockout)
        self.assertEqual(door.session_timeout(), 30.0)
        self.assertEqual(door.sessions, {"a session"})  # sessions in progress stay


class ErrorsModuleTests(unittest.TestCase):
    def test_the_admin_api_imports_without_the_service(self):
        code = ("import sys, smtprelay.admin.api; "
                "sys.exit('smtprelay.service' in sys.modules)")
        subprocess.run([sys.executable, "-c", code], check=True)

    def test_the_errors_carry_their_fields(self):
        from smtprelay import errors

        e = errors.ApplyError("bad", {"smtp.listen": "in use"})
        self.assertEqual((str(e), e.fields), ("bad", {"smtp.listen": "in use"}))
        e = errors.ListenError("smtp.listen: in use", "smtp.listen")
        self.assertEqual((e.key, e.spec), ("smtp.listen", None))
