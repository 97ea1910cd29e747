"""The worlds of the provider fault tests: a relay, a provider fake behind a fault proxy.

Shared by :mod:`tests.test_hostile_provider_faults`.  ``start_relay`` runs the
relay with the short timeout and retries those tests need; ``send_batch`` submits
marked messages.  ``M365World`` (the Graph fake) and ``GmailWorld`` (the Google
fake) offer the same steering, each in its fake's own words, so that one test
can script a fault for either provider:

- ``proxy``: the :class:`~tests.faultproxy.FaultProxy` in front of the fake;
- ``hang(route, times)``: the fake holds its answer (``route``: "token" or "send");
- ``lose_answers(loss, times)``: the message is accepted, then the answer is lost
  (``loss``: one of ``LOSSES``);
- ``reject(times)``: the fake refuses sends with a 400;
- ``storm(retry_after)``: 429s (with ``retry_after`` only) and 5xx;
- ``send``, ``received`` and ``audit``: messages in, what the fake got, the verdict.
"""

import time

from tests import torture
from tests.fakes.google_accounts import GMAIL_SEND
from tests.faultproxy import FaultProxy
from tests.graph_support import CLIENT, MAILBOX, SECRET, TENANT
from tests.hostile import Audit, marker, message, settle, submit
from tests.relay import RelayProcess

N = torture.scale(4, 16)  # messages per fault
TIMEOUT = "2s"
# the long form's storms need more attempts per message than 12 s allow
DELIVERY = {"retry": ["1s"], "max_age": torture.scale("12s", "60s"), "concurrency": 4}
SETTLE = torture.scale(60, 240)  # seconds: max_age, a provider timeout or two, the queue


def start_relay(directory, provider, delivery=None, sender=None):
    config = {"delivery": {**DELIVERY, **(delivery or {})}}
    if sender:
        config["sender"] = {"default": sender, "allowed": ["*"]}
    relay = RelayProcess(directory, config)
    relay.config["provider"] = provider
    return relay.start()


def send_batch(relay, tag, sender, to, count=N, size=2000):
    """``count`` marked messages -> {marker: relay id}."""
    accepted = {}
    for n in range(count):
        mark = marker(tag, n)
        accepted[mark] = submit(relay, sender, [to], message(sender, to, mark, size))
    return accepted


class APIWorld:
    """What the two API providers' worlds share; a subclass says how its fake is steered."""

    sender = to = ""
    LOSSES = ()

    def send(self, tag, count=N, size=2000):
        return send_batch(self.relay, tag, self.sender, self.to, count, size)

    def audit(self, accepted, faults=None, expect="sent", grace=0.5):
        settle(self.relay, accepted.values(), SETTLE)
        time.sleep(grace)
        if faults is None:
            faults = self.proxy.faults + self.fake_faults()
        return Audit(self.relay, accepted, self.received(), faults).check(expect)

    def stop(self):
        self.relay.stop()
        self.proxy.stop()


class M365World(APIWorld):
    """The Graph fake (authority and Graph) behind the proxy, and a relay."""

    sender = MAILBOX
    to = "ann@example.com"
    LOSSES = ("hang", "drop", "reset")
    _ROUTES = {"token": "token", "send": "sendMail"}

    def __init__(self, directory, fake, ca_file=None, delivery=None):
        self.fake = fake
        self.scripted = 0  # the answers scripted so far
        fake.setup()
        self.proxy = FaultProxy(fake.port)
        fake.control("POST", "settings", {"proxy_ports": [self.proxy.port]})
        url = f"https://127.0.0.1:{self.proxy.port}"
        self.relay = start_relay(directory, {
            "type": "m365", "tenant_id": TENANT, "client_id": CLIENT, "client_secret": SECRET,
            "authority": url, "graph_endpoint": url, "ca_file": str(ca_file or fake.ca_file),
            "save_to_sent_items": True, "timeout": TIMEOUT}, delivery, sender=MAILBOX)

    def received(self):
        return [m["message_id"] for m in self.fake.messages(content=False)]

    def fault(self, route="sendMail", times=1, **fault):
        self.fake.control("POST", "faults", {"route": route, "times": times, **fault})
        self.scripted += times

    def _storm(self, route="sendMail", **storm):
        self.fake.control("POST", "faults/storm", {"route": route, **storm})
        self.scripted += storm["count"]

    def fake_faults(self):
        """How many scripted answers the fake has given."""
        left = sum(f.get("times", 1) for f in self.fake.control("GET", "faults")["faults"])
        return self.scripted - left

    def hang(self, route, times):
        self.fault(self._ROUTES[route], action="hang", times=times)

    def lose_answers(self, loss, times):
        self.fault(action=f"accept_then_{loss}", times=times)

    def reject(self, times):
        self._storm(count=times, status=400)

    def storm(self, retry_after):
        """429s, then 503, 500, 502 and 504 (a 504 to a send is ambiguous), with or
        without Retry-After (without, a 429 would hold the mailbox 10 s: only 5xx then)."""
        if retry_after is not None:
            self._storm(count=N, status=429, retry_after=retry_after, retry_after_every=1)
        for status in (503, 500, 502, 504):
            self._storm(count=N // 2 or 1, status=status, retry_after=retry_after,
                        retry_after_every=2)


class GmailWorld(APIWorld):
    """The Google fake (token endpoint and Gmail API) behind the proxy, and a relay."""

    sender = "app@example.com"
    to = "alice@example.org"
    LOSSES = ("hang", "drop")

    def __init__(self, directory, fake, account, ca, ca_file=None, delivery=None):
        self.fake = fake
        fake.control("POST", "reset")
        fake.control("POST", "mailboxes", {"address": self.sender})
        fake.control("POST", "service-accounts",
                     account.registration({self.sender: [GMAIL_SEND]}))
        self.proxy = FaultProxy(fake.port)
        url = f"https://127.0.0.1:{self.proxy.port}"
        directory.mkdir(parents=True, exist_ok=True)
        self.relay = start_relay(directory, {
            "type": "gmail", "service_account_file": str(account.write(directory / "sa.json")),
            "token_uri": f"{url}/token", "api_endpoint": url,
            "ca_file": str(ca_file or ca.ca_path), "timeout": TIMEOUT}, delivery,
            sender=self.sender)

    def received(self):
        return [m["message_id"] for m in self.fake.messages(bodies=False)]

    def fault(self, route="send", **fault):
        self.fake.control("POST", "faults", {"route": route, **fault})

    def fake_faults(self):
        return sum(f["fired"] for f in self.fake.control("GET", "faults")["faults"])

    def hang(self, route, times):
        self.fault(route, kind="hang", count=times)

    def lose_answers(self, loss, times):
        self.fault(kind=loss, process=True, count=times)

    def reject(self, times):
        self.fault(status=400, reason="invalidArgument", message="Invalid To header", count=times)

    def storm(self, retry_after):
        """429s (with Retry-After only), 503, 500 and 502, and 500s at random throughout."""
        extra = {} if retry_after is None else {"retry_after": retry_after}
        if retry_after is not None:
            # without Retry-After a 429 holds the mailbox 60 s and more: beyond this test
            self.fault(status=429, reason="rateLimitExceeded", count=N, **extra)
        self.fault(status=503, count=N // 2 or 1, **extra)
        self.fault(status=500, reason="backendError", count=N // 2 or 1, **extra)
        self.fault(status=502, count=N // 2 or 1, **extra)
        self.fault(status=500, reason="backendError", count=None, probability=0.3)
