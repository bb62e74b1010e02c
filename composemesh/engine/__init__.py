"""The Docker engine side of composemesh: images (built offline), the base image, compose.

``images.ensure_images`` and ``base_image.ensure_base_image`` are the entry points; nothing
is imported here so that importing one module does not pull in the others.
"""
