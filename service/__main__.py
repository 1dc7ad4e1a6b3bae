from service.cli import serve_main

serve_main()
