"""The designs stockhold is measured against (`make bench`), served like stockhold (uvicorn, 2 workers):

- ``POST /trivial``: the cheapest FastAPI JSON endpoint there is, the framework's own ceiling on this
  machine;
- ``POST /pg/cte``: a reservation as a one-statement conditional ``UPDATE ... WHERE available >= $1`` and
  ``INSERT`` in one CTE, the PostgreSQL-only design a careful team would pick;
- ``POST /pg/txn``: the textbook transaction, BEGIN / UPDATE ... RETURNING / INSERT / COMMIT.

The PostgreSQL peers take the same JSON body as POST /v1/reservations (validated by a pydantic model, as
any FastAPI service would) and never oversell either: the conditional UPDATE takes the row lock, so
concurrent reservations of one hot SKU queue on it, which is what the benchmark shows.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_stock (sku text PRIMARY KEY, available bigint NOT NULL CHECK (available >= 0));
CREATE TABLE IF NOT EXISTS peer_hold (
    id bigserial PRIMARY KEY, sku text NOT NULL, user_id text NOT NULL, quantity int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""
CTE = """
WITH taken AS (
    UPDATE peer_stock SET available = available - $2 WHERE sku = $1 AND available >= $2 RETURNING sku
)
INSERT INTO peer_hold (sku, user_id, quantity) SELECT sku, $3, $2 FROM taken RETURNING id
"""
TAKE = "UPDATE peer_stock SET available = available - $2 WHERE sku = $1 AND available >= $2 RETURNING available"
HOLD = "INSERT INTO peer_hold (sku, user_id, quantity) VALUES ($1, $2, $3) RETURNING id"


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(ge=1, le=1000)


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: str = Field(min_length=1, max_length=128)
    items: list[Item] = Field(min_length=1, max_length=1)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # 16 connections per worker: more only queue on the hot row's lock
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=16, max_size=16)
    async with pool.acquire() as conn:
        await conn.execute(SCHEMA)
    app.state.pg = pool
    try:
        yield
    finally:
        await pool.close()


app = FastAPI(lifespan=lifespan)


@app.post("/trivial")
async def trivial() -> dict[str, bool]:
    return {"ok": True}


def _held(order: Order, hold_id: int) -> JSONResponse:
    item = order.items[0]
    return JSONResponse({"id": hold_id, "user_id": order.user_id, "sku": item.sku, "quantity": item.quantity}, 201)


_SOLD_OUT = JSONResponse({"code": "insufficient_stock"}, 409)


@app.post("/pg/cte", status_code=201)
async def reserve_cte(order: Order) -> JSONResponse:
    item = order.items[0]
    async with app.state.pg.acquire() as conn:
        hold_id = await conn.fetchval(CTE, item.sku, item.quantity, order.user_id)
    return _SOLD_OUT if hold_id is None else _held(order, hold_id)


@app.post("/pg/txn", status_code=201)
async def reserve_txn(order: Order) -> JSONResponse:
    item = order.items[0]
    async with app.state.pg.acquire() as conn, conn.transaction():
        if await conn.fetchval(TAKE, item.sku, item.quantity) is None:
            return _SOLD_OUT
        hold_id = await conn.fetchval(HOLD, item.sku, order.user_id, item.quantity)
    return _held(order, hold_id)
