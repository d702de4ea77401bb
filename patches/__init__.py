"""SGLang touch points, one module each (installed as ``kara_patches``)."""
