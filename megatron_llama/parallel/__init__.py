"""Parallel building blocks: process groups, mappings, parallel layers, schedules. All communication lives here."""
