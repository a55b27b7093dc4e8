"""Push notifications: waking a device that is offline everywhere in the cluster.

The pieces, each with one job:

- ``provider.py``: what every provider implements (:class:`Provider`), the
  :class:`Notification` it is asked to send and the :class:`PushResult` it
  answers;
- ``fcm.py`` (Firebase Cloud Messaging HTTP v1), ``apns.py`` (Apple, HTTP/2
  with token authentication), ``webpush.py`` (browsers: VAPID and RFC 8291
  encryption), ``webhook.py`` (an HMAC-signed POST to the app's backend);
- ``config.py``: ``--push-config=FILE`` (TOML), building the providers;
- ``dispatcher.py``: the queue in front of the providers: timeouts, retries
  with exponential backoff and ``Retry-After``, a circuit breaker per provider;
- ``scheduler.py``: when to push (after the copy is stored, a grace period,
  one push per device per window, claimed in the store so that exactly one
  server of the cluster sends it).

Push never runs in the routing path: routing only tells the scheduler which
offline nodes got a stored copy, and everything else happens later.
"""
