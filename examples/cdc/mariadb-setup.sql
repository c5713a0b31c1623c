-- The MariaDB table of the mysql_cdc example (examples/cdc/mariadb.yaml).
-- The server needs its binlog on in row format (log_bin, binlog_format=ROW,
-- server_id: .ci/services.sh sets them on the development machine).
-- Run with: mysql -h 127.0.0.1 -uroot test < examples/cdc/mariadb-setup.sql
DROP TABLE IF EXISTS shop_orders;
CREATE TABLE shop_orders (
  id INT PRIMARY KEY,
  customer VARCHAR(100) NOT NULL,
  total DECIMAL(12,2) NOT NULL,
  status ENUM('new', 'paid', 'shipped') NOT NULL DEFAULT 'new',
  tags JSON,
  placed_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
) ENGINE=InnoDB;
INSERT INTO shop_orders (id, customer, total, status, tags) VALUES
  (1, 'Ada', 12.50, 'new', '["gift"]'),
  (2, 'Grace', 99.90, 'paid', '[]');
