"""Plugins written for the tests: well-behaved ones that record how the server calls
them, and deliberately broken ones."""
