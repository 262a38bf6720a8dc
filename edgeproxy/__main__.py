from edgeproxy.cli import main

raise SystemExit(main())
