-- The legacy SQLite database the example polls (sqlite3 legacy.db < setup.sql)
-- and, at the end, the MariaDB table it upserts into.
CREATE TABLE IF NOT EXISTS customers (
  id         INTEGER PRIMARY KEY,
  name       TEXT NOT NULL,
  email      TEXT,
  balance    NUMERIC,            -- read as a string: no float on the way
  active     BOOLEAN,
  updated_at TEXT NOT NULL       -- 'YYYY-MM-DD HH:MM:SS', set on every change
);
CREATE INDEX IF NOT EXISTS customers_updated ON customers (updated_at, id);
INSERT OR REPLACE INTO customers VALUES
  (1, 'Ada Lovelace', 'ada@example.com', '1250.75', 1, '2024-05-01 10:00:00'),
  (2, 'Charles Babbage', 'cb@example.com', '-20.00', 1, '2024-05-01 10:00:00'),
  (3, 'Grace Hopper', NULL, NULL, 0, '2024-05-02 08:30:00');
