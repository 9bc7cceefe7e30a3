"""The suite keeps its compiled programs in the persistent compilation cache (as the command line
does), so a rerun does not compile again; FDISTILL_COMPILATION_CACHE=0 turns it off."""
from fdistill import compilation_cache

compilation_cache.enable()
