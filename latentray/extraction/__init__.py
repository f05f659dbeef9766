"""The extraction stage: models described, datasets read, (shard, model) units run by Ray
actors, each recorded in the manifest."""
