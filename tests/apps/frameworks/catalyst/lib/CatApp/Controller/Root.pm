package CatApp::Controller::Root;
use Moose;
use namespace::autoclean;
use Digest::MD5 ();

BEGIN { extends 'Catalyst::Controller' }

__PACKAGE__->config(namespace => '');

sub index :Path :Args(0) {
    my ($self, $c) = @_;
    $c->stash(template => 'index.tt', who => "Cat\x{e9}", items => [1 .. 3]);
}

sub json :Local :Args(0) {
    my ($self, $c) = @_;
    $c->res->content_type('application/json; charset=utf-8');
    $c->res->body(qq({"framework":"catalyst","greeting":"h\\u00e9llo","items":[1,2,3]}));
}

sub upload :Local :Args(0) {
    my ($self, $c) = @_;
    my $up = $c->req->upload('file') or do {
        $c->res->status(400);
        return $c->res->body("no file\n");
    };
    my $data = $up->slurp;
    $c->res->content_type('text/plain');
    $c->res->body(sprintf "%s %d %s\n", $up->filename, length $data, Digest::MD5::md5_hex($data));
}

sub stream :Local :Args(0) {
    my ($self, $c) = @_;
    $c->res->content_type('text/plain');
    $c->stash(no_render => 1);
    $c->res->write("chunk $_\n") for 1 .. 3;
}

sub session :Local :Args(0) {
    my ($self, $c) = @_;
    my $n = ++$c->session->{count};
    $c->res->content_type('text/plain');
    $c->res->body("count $n\n");
}

sub redirect :Local :Args(0) {
    my ($self, $c) = @_;
    $c->res->redirect($c->uri_for('/json'));
}

# where the app was loaded from and what it found while loading
sub where :Local :Args(0) {
    my ($self, $c) = @_;
    require Cwd;
    $c->res->content_type('text/plain');
    $c->res->body(join '', map { "$_->[0]=$_->[1]\n" } [cwd => Cwd::getcwd()],
        [state => $ENV{FRAMEWORKS_STATE} // '-'], [lib => $INC{'CatApp.pm'}]);
}

sub die :Local :Args(0) {
    die "the route died\n";
}

sub notes :Local :Args(0) {
    my ($self, $c) = @_;
    my $rs = $c->model('DB::Note');
    if ($c->req->method eq 'POST') {
        $rs->create({ body => $c->req->body_params->{body} });
    }
    $c->res->content_type('text/plain; charset=utf-8');
    $c->res->body(join '', map { $_->body . "\n" } $rs->search({}, { order_by => 'id' })->all);
}

# The app's own log line, with a character outside Latin-1, on the
# STDERR that Catalyst put its :encoding(UTF-8) layer on.
sub log :Local :Args(0) {
    my ($self, $c) = @_;
    binmode STDERR, ':encoding(UTF-8)';
    print STDERR "catapp says \x{2603} caf\x{e9}\n";
    $c->res->content_type('text/plain');
    $c->res->body("logged\n");
}

sub default :Path {
    my ($self, $c) = @_;
    $c->res->status(404);
    $c->res->content_type('text/plain');
    $c->res->body("not found\n");
}

sub render : ActionClass('RenderView') {}

sub end :Private {
    my ($self, $c) = @_;
    $c->forward('render') unless $c->stash->{no_render};
}

1;
