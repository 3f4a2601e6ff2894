# A Mojolicious::Lite app as its users write one, served through PSGI
# (app->start returns the PSGI app when PLACK_ENV is set).
use Mojolicious::Lite -signatures;
use Digest::MD5 ();

app->secrets([$ENV{MOJO_APP_SECRET} // 'frameworks-test-secret']);

get '/' => sub ($c) { $c->stash(who => "Mojo\x{e9}", items => [1 .. 3]); $c->render(template => 'index') };

get '/json' => sub ($c) { $c->render(json => { framework => 'mojolicious', greeting => "h\x{e9}llo", items => [1, 2, 3] }) };

post '/upload' => sub ($c) {
    my $up = $c->req->upload('file') or return $c->render(text => "no file\n", status => 400);
    my $data = $up->slurp;
    $c->render(text => sprintf("%s %d %s\n", $up->filename, length $data, Digest::MD5::md5_hex($data)));
};

get '/stream' => sub ($c) {
    $c->res->headers->content_type('text/plain');
    $c->write_chunk("chunk $_\n") for 1 .. 3;
    $c->write_chunk('');
};

get '/session' => sub ($c) {
    my $n = ++$c->session->{count};
    $c->render(text => "count $n\n");
};

get '/redirect' => sub ($c) { $c->redirect_to('/json') };

get '/die' => sub ($c) { die "the route died\n" };

app->start;

__DATA__

@@ index.html.ep
<!DOCTYPE html>
<html><head><title>MojoApp</title></head>
<body><h1>Hello from <%= $who %></h1>
<ul><% for my $i (@$items) { %><li><%= $i %></li><% } %></ul>
</body></html>
