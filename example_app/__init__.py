"""A small shop whose order board updates live when orders change.

Run it (from the repository root)::

    flask --app example_app dbnotify install-triggers
    flask --app example_app run

and open http://127.0.0.1:5000. Then change orders from anywhere: the page,
another terminal (``python -m example_app.add_order tea``), or ``sqlite3`` on
``example_app/instance/example.db``.

To run it on PostgreSQL instead, set ``EXAMPLE_DATABASE_URL`` for every
command::

    export EXAMPLE_DATABASE_URL=postgresql://user@host:5432/dbname
    flask --app example_app dbnotify install-triggers
    flask --app example_app run

The page asks for the orders once its event stream is open (``/events``:
``dbnotify.stream(Order)``, server-sent events), then applies every change
the stream brings, its own included: one JavaScript function in
``templates/board.html`` draws every row.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, redirect, render_template, request, url_for
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_dbnotify import DBNotify


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
dbnotify = DBNotify()


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str]
    status: Mapped[str] = mapped_column(default="new")
    created_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        """What the page draws a row from in the list (a live event carries
        the row's columns, these among them)."""
        return {"id": self.id, "item": self.item, "status": self.status}


dbnotify.watch(Order)


def create_app(**config: Any) -> Flask:
    # Keep the database beside the example: example_app/instance/example.db.
    app = Flask(__name__, instance_path=os.path.join(os.path.dirname(__file__), "instance"))
    os.makedirs(app.instance_path, exist_ok=True)
    url = make_url(os.environ.get("EXAMPLE_DATABASE_URL", "sqlite:///example.db"))
    if url.drivername == "postgresql":
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; use the
        # psycopg2 that Flask-DBNotify brings.
        url = url.set(drivername="postgresql+psycopg2")
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config.update(config)
    db.init_app(app)
    with app.app_context():
        db.create_all()
    dbnotify.init_app(app)

    @app.get("/")
    def index() -> str:
        return render_template("board.html")

    @app.get("/orders.json")
    def orders() -> list[dict[str, Any]]:
        newest_first = db.select(Order).order_by(Order.id.desc())
        return [order.to_json() for order in db.session.scalars(newest_first)]

    @app.post("/orders")
    def add() -> Any:
        order = Order(item=request.form.get("item") or "something")
        db.session.add(order)
        db.session.commit()
        return answer(order, 201)

    @app.post("/orders/<int:order_id>/ship")
    def ship(order_id: int) -> Any:
        order = db.get_or_404(Order, order_id)
        order.status = "shipped"
        db.session.commit()
        return answer(order, 200)

    @app.get("/events")
    def events() -> Response:
        # Server-sent events: every change of an order, as it commits, from
        # any writer; a browser that reconnects gets what it missed.
        return dbnotify.stream(Order)

    return app


def answer(order: Order, status: int) -> Any:
    """The page's fetch() asks for JSON: it gets the order (the change
    itself arrives over /events). A plain form post, without JavaScript,
    is sent back to the board."""
    if request.accept_mimetypes.best == "application/json":
        return order.to_json(), status
    return redirect(url_for("index"), 303)
