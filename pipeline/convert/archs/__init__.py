"""One module per architecture family; each registers its ArchSpec classes with `@register(...)`."""
