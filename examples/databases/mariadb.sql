-- The MariaDB table the example upserts into (mysql -h127.0.0.1 -uroot test < mariadb.sql).
CREATE TABLE IF NOT EXISTS crm_customers (
  customer_id BIGINT PRIMARY KEY,
  full_name   VARCHAR(200) NOT NULL,
  email       VARCHAR(200),
  balance     DECIMAL(14,2),
  active      BOOLEAN,
  changed_at  DATETIME(6)
);
