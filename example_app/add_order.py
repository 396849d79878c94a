"""Add an order from outside the app: ``python -m example_app.add_order tea``.

A plain script with its own connection, like a cron job or another
service: the running app still sees the change. It writes to the database
the app uses (``EXAMPLE_DATABASE_URL``, else example_app/instance/example.db)
and says which.
"""

from __future__ import annotations

import sys

from example_app import Order, create_app, db

if __name__ == "__main__":
    # A script, not a server: it only writes, so it starts no listener.
    app = create_app(DBNOTIFY_AUTOSTART=False)
    with app.app_context():
        order = Order(item=" ".join(sys.argv[1:]) or "tea")
        db.session.add(order)
        db.session.commit()
        where = db.engine.url.render_as_string(hide_password=True)
        print(f"added order #{order.id}: {order.item} ({where})")
