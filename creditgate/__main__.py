from creditgate.cli import main

raise SystemExit(main())
