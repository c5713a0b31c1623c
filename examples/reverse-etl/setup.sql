-- The warehouse table the reverse-ETL example reads (psql -h 127.0.0.1 -U postgres test -f setup.sql).
CREATE TABLE IF NOT EXISTS account_scores (
  account_id  bigint PRIMARY KEY,
  email       text NOT NULL,
  plan        text NOT NULL,
  health      numeric(5,2) NOT NULL,   -- sent as a string: no float on the way
  churn_risk  boolean NOT NULL DEFAULT false,
  updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS account_scores_updated ON account_scores (updated_at, account_id);

-- keep updated_at honest on every change
CREATE OR REPLACE FUNCTION account_scores_touch() RETURNS trigger AS $$
BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS account_scores_touch ON account_scores;
CREATE TRIGGER account_scores_touch BEFORE INSERT OR UPDATE ON account_scores
  FOR EACH ROW EXECUTE FUNCTION account_scores_touch();

INSERT INTO account_scores (account_id, email, plan, health, churn_risk) VALUES
  (1, 'ops@acme.example', 'enterprise', 92.50, false),
  (2, 'it@globex.example', 'team', 41.00, true)
ON CONFLICT (account_id) DO NOTHING;
