-- Issue #16: a tenant's weight, its share of saturated backend slots relative to the other
-- tenants (the fair queue serves a tenant with weight 2 twice as much slot-time as one with 1).
ALTER TABLE tenants ADD COLUMN weight INTEGER NOT NULL DEFAULT 1 CHECK (weight >= 1 AND weight <= 1000);
