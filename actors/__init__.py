"""OrgBillingActor (pure core), ShardActor (Ray shell) and placement."""
