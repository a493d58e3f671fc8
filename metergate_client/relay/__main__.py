import sys

from metergate_client.relay.run import main

sys.exit(main())
