-- The "legacy" PostgreSQL table the CDC example reads (psql -h 127.0.0.1
-- -U postgres -d test -f examples/cdc/setup.sql). The server needs
-- `wal_level = logical` (.ci/services.sh sets it on the shared instance).
DROP TABLE IF EXISTS shop_orders;
CREATE TABLE shop_orders (
  id         bigint PRIMARY KEY,
  customer   text NOT NULL,
  total      numeric(12,2) NOT NULL,   -- arrives as a string: "12.50", no float on the way
  status     text NOT NULL,
  tags       text[],                   -- arrives as a JSON array
  placed_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO shop_orders (id, customer, total, status, tags) VALUES
  (1, 'Ada Lovelace', 1250.75, 'paid', '{vip}'),
  (2, 'Charles Babbage', 20.00, 'new', NULL);
