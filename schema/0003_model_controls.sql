-- 0003_model_controls: may a tenant steer the shared models (keep_alive, load-time options)?
--
-- FALSE (the default): nzgw strips `keep_alive` and the load-time options (num_ctx, num_batch,
-- num_gpu, main_gpu, use_mmap, num_thread) from the tenant's requests, so the backend's own
-- defaults apply and no tenant can unload, pin or reload a model that others share.

ALTER TABLE tenants ADD COLUMN allow_model_controls BOOLEAN NOT NULL DEFAULT FALSE;
