"""The admin side: REST API, web page and /metrics, served by Klein on the relay's reactor.

- ``api.py``: the Klein application (every route of ``shared/spec/admin-api.md``);
- ``site.py``: the twisted.web Site around it (request body cap, security headers);
- ``auth.py``: the bearer token check (constant time) and the cross-origin guard;
- ``shapes.py``: pure conversions between the store's values and the JSON on the wire
  (RFC 3339 times, delivery-log query validation);
- ``warnings.py``: every warning an administrator should see, from one snapshot (pure);
- ``monitor.py``: takes that snapshot periodically, logs warnings as they appear;
- ``configfile.py``: writes a new configuration back to relay.toml atomically, comments kept;
- ``testmail.py``: the RFC 5322 test message (pure);
- ``openapi.py``: the OpenAPI 3 document served at ``/api/openapi.json``;
- ``static/``: the web page (plain HTML, JS and CSS; no build step, no CDN).
"""
