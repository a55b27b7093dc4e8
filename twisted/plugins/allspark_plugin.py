"""twistd plugin: ``twistd -n allspark``. Kept trivial so that it always imports."""
from twisted.application.service import ServiceMaker

allspark = ServiceMaker(
    "Allspark", "allspark.tap", "Allspark realtime messaging router", "allspark"
)
