"""Example task modules (entrypoints under the default allow-list prefix ``examples.``)."""
